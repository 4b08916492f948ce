"""Pure decisions at the front door: where a request goes (routing), who may see it (policy, cors, disclosure).

Nothing here does I/O or imports aiohttp: both lanes ask these modules and get the same answer.
"""
