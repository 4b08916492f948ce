// The hub page: renders the snapshot the server embedded, then follows /api/v1/hub/events so ports, phases and
// share links change in place (no reload, focus and half-made choices kept). Every change is an explicit action.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("hub-data").textContent);
  const root = document.getElementById("workspaces");
  const tokens = new Map(); // share id -> the creation answer (its token is shown only once, so keep it here)
  const pendingRevokes = new Map(); // share id -> timer of a revoke that can still be undone
  const UNDO_MS = 5000;
  const AUDIENCES = { anyone: "anyone with the link", org: "signed-in org members", people: "named people" };
  const VISIBILITIES = ["private", "org", "public"];

  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("aria") || key === "role" || key === "for") node.setAttribute(key.replace(/^aria/, "aria-").toLowerCase(), value);
      else node[key] = value;
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  };
  const toastBox = document.getElementById("toast");
  let toastTimer = 0;
  const toast = (text) => {
    toastBox.textContent = text; toastBox.hidden = false;
    clearTimeout(toastTimer); toastTimer = setTimeout(() => { toastBox.hidden = true; }, 3000);
  };
  const call = async (method, url, body) => {
    const response = await fetch(url, { method, headers: { "Content-Type": "application/json", Accept: "application/json" },
                                        body: body === undefined ? undefined : JSON.stringify(body) });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((answer.error && answer.error.message) || response.statusText);
    return answer;
  };
  // Copy says "Copied" only when the clipboard took the text; otherwise the text is selected for Ctrl+C.
  const copy = async (text, what, field) => {
    try { await navigator.clipboard.writeText(text); toast(`Copied ${what}`); }
    catch (error) {
      if (field) { field.focus(); field.select(); }
      toast(`Could not copy: select the ${what} and press Ctrl+C`);
    }
  };
  const relative = (at) => {
    if (!at) return "never";
    const delta = at - Date.now() / 1000;
    const size = Math.abs(delta) < 60 ? Math.abs(delta) : Math.round(Math.abs(delta) / 60) * 60; // 1 d, not 24 h
    const amount = size >= 86400 ? `${Math.round(size / 86400)} d` : size >= 3600 ? `${Math.round(size / 3600)} h`
      : size >= 60 ? `${Math.round(size / 60)} min` : null;
    if (amount === null) return delta > 0 ? "in less than a minute" : "just now";
    return delta > 0 ? `in ${amount}` : `${amount} ago`;
  };
  const manages = (ws) => ws.role === "owner" || ws.role === "admin";

  // ------------------------------------------------------------------------------------------- one workspace
  const sections = new Map();

  const makeSection = (ws) => {
    const id = ws.id;
    const phase = el("span", { className: "phase" });
    const activity = el("span", { className: "muted" });
    const controls = el("div", { className: "controls" });
    for (const [action, label] of [["wake", "Start"], ["stop", "Stop"], ["archive", "Archive"]]) {
      const button = el("button", { type: "button", className: "button small quiet", textContent: label,
                                    ariaLabel: `${label} workspace ${id}` });
      button.dataset.action = action;
      button.addEventListener("click", async () => {
        button.disabled = true;
        try { await call("POST", `/api/v1/workspaces/${id}/${action}`); }
        catch (error) { toast(error.message); }
        finally { button.disabled = false; }
      });
      controls.append(button);
    }
    const portsBody = el("tbody");
    const ports = el("table", { className: "ports", ariaLabel: `Ports of ${id}` },
      el("thead", {}, el("tr", {}, ...["Port", "Label", "Status", "Who can see it", "Protocol", "Learns who visits", "Link", ""].map(
        (name) => el("th", { scope: "col", textContent: name })))), portsBody);
    const openNumber = el("input", { type: "number", min: 1, max: 65535, required: true, id: `open-${id}` });
    const openForm = el("form", { className: "open-port" },
      el("label", { className: "inline", for: `open-${id}`, textContent: "Open a port by number" }), openNumber,
      el("button", { type: "submit", className: "button small", textContent: "Open" }));
    openForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const port = parseInt(openNumber.value, 10);
      window.open(data.port_url.replace("{workspace}", id).replace("{port}", String(port)), "_blank", "noopener");
    });
    const section = el("section", { className: "ws", ariaLabelledby: `ws-${id}` },
      el("div", { className: "ws-head" }, el("h2", { id: `ws-${id}`, textContent: id }), phase, activity, controls),
      el("p", { className: "muted" }, `Owner ${ws.owner}`,
        ws.collaborators.length ? ` · collaborators ${ws.collaborators.join(", ")}` : "", " · ",
        el("a", { href: ws.ide_url, textContent: "Open IDE" })),
      el("h3", { textContent: "Ports" }), ports, openForm);
    section.dataset.ws = id;
    const parts = { section, phase, activity, controls, portsBody, rows: new Map() };
    if (manages(ws)) Object.assign(parts, makeShareForm(ws, section));
    const sharesBody = el("tbody");
    section.append(el("h3", { textContent: "Share links" }), el("table", { className: "shares",
                                                                           ariaLabel: `Share links of ${id}` },
      el("thead", {}, el("tr", {}, ...["Link", "For", "Expires", "Uses", "Last used", ""].map(
        (name) => el("th", { scope: "col", textContent: name })))), sharesBody));
    parts.sharesBody = sharesBody;
    return parts;
  };

  // ------------------------------------------------------------------------------------------------- ports
  const makePortRow = (ws, port) => {
    const row = el("tr");
    row.dataset.port = port.port;
    const label = el("td"); const status = el("td"); const who = el("td");
    const link = el("a", { target: "_blank", rel: "noopener", className: "url" });
    const copyButton = el("button", { type: "button", className: "button small quiet", textContent: "Copy",
                                      ariaLabel: `Copy the URL of port ${port.port}` });
    copyButton.addEventListener("click", () => copy(link.href, `URL of port ${port.port}`));
    const qrButton = el("button", { type: "button", className: "button small quiet", textContent: "QR",
                                    ariaLabel: `Show a QR code for port ${port.port}`, ariaExpanded: "false" });
    const qr = el("div", { className: "qr", hidden: true });
    qrButton.addEventListener("click", () => {
      qr.hidden = !qr.hidden; qrButton.setAttribute("aria-expanded", String(!qr.hidden));
      if (!qr.hidden) qr.replaceChildren(el("img", { src: `/qr.svg?url=${encodeURIComponent(link.href)}`,
                                                    alt: `QR code of ${link.href}` }));
    });
    const protocol = el("td");
    const knows = el("td"); const agreed = el("span", { className: "muted" });
    if (manages(ws)) {
      const select = el("select", { id: `vis-${ws.id}-${port.port}`, ariaLabel: `Who can see port ${port.port}` });
      for (const value of VISIBILITIES) {
        const allowed = VISIBILITIES.indexOf(value) <= VISIBILITIES.indexOf(data.max_visibility);
        select.append(el("option", { value, textContent: value, disabled: !allowed }));
      }
      const scheme = el("select", { id: `proto-${ws.id}-${port.port}`, ariaLabel: `Protocol of port ${port.port}` },
        el("option", { value: "http", textContent: "HTTP" }), el("option", { value: "https", textContent: "HTTPS" }));
      const name = el("input", { id: `label-${ws.id}-${port.port}`, maxLength: 80, size: 14, autocomplete: "off",
                                 ariaLabel: `Label of port ${port.port}` });
      const identity = el("input", { type: "checkbox", id: `identity-${ws.id}-${port.port}`,
                                     ariaLabel: `Port ${port.port} learns who visits, if they agree` });
      const save = el("button", { type: "button", className: "button small", textContent: "Save", disabled: true,
                                  ariaLabel: `Save changes to port ${port.port}` });
      const changes = () => {
        const body = {};
        if (name.value.trim() !== row.dataset.label) body.label = name.value.trim();
        if (select.value !== row.dataset.visibility) body.visibility = select.value;
        if (scheme.value !== row.dataset.protocol) body.protocol = scheme.value;
        if (String(identity.checked) !== row.dataset.identity) body.identity = identity.checked;
        return body;
      };
      for (const input of [select, scheme, name, identity]) {
        for (const type of ["change", "input"]) {
          input.addEventListener(type, () => { save.disabled = Object.keys(changes()).length === 0; });
        }
      }
      name.addEventListener("keydown", (event) => { if (event.key === "Enter" && !save.disabled) save.click(); });
      save.addEventListener("click", async () => {
        const body = changes();
        if (body.visibility === "public" && !window.confirm(
          `Make port ${port.port} of ${ws.id} public? Anyone who has its URL can open it, without signing in.`)) return;
        save.disabled = true;
        try {
          await call("PUT", `/api/v1/workspaces/${ws.id}/ports/${port.port}`, body);
          row.dataset.visibility = select.value; row.dataset.protocol = scheme.value;
          row.dataset.identity = String(identity.checked);
          if ("label" in body) row.dataset.label = body.label;
          toast(body.visibility ? `Port ${port.port} is now ${select.value}`
            : body.protocol ? `Port ${port.port} is reached over ${scheme.value.toUpperCase()}`
              : "identity" in body ? (body.identity ? `Port ${port.port} asks visitors to share who they are`
                : `Port ${port.port} learns nothing about visitors`)
              : body.label ? `Port ${port.port} is now called ${body.label}` : `Port ${port.port} has no label now`);
        } catch (error) { toast(error.message); save.disabled = false; }
      });
      who.append(select, " ", save);
      protocol.append(scheme);
      label.append(name);
      knows.append(el("label", { className: "inline", for: identity.id }, identity, " with consent"), " ", agreed);
      Object.assign(row, { _select: select, _scheme: scheme, _name: name, _identity: identity, _save: save });
    } else {
      knows.append(agreed);
    }
    row.append(el("td", { textContent: String(port.port) }), label, status, who, protocol, knows,
      el("td", {}, link, qr), el("td", {}, copyButton, " ", qrButton));
    Object.assign(row, { _label: label, _status: status, _who: who, _protocol: protocol, _agreed: agreed,
                         _link: link });
    return row;
  };

  const updatePortRow = (ws, row, port) => {
    if (!row._name) row._label.textContent = port.label || "—";
    row._status.replaceChildren(port.listening ? el("span", { className: "listening", textContent: "listening" })
      : "not listening");
    if (row._link.href !== port.url) { row._link.href = port.url; row._link.textContent = port.url; }
    row._agreed.textContent = port.identity ? `${port.consented} agreed` : (row._identity ? "" : "no");
    if (row._select) {
      // a choice not saved yet is kept; the rest follows what the server says
      const known = row.dataset.visibility !== undefined;
      const dirtyVisibility = known && row._select.value !== row.dataset.visibility;
      const dirtyProtocol = known && row._scheme.value !== row.dataset.protocol;
      const dirtyLabel = known && row._name.value.trim() !== row.dataset.label;
      const dirtyIdentity = known && String(row._identity.checked) !== row.dataset.identity;
      row.dataset.visibility = port.visibility; row.dataset.protocol = port.protocol; row.dataset.label = port.label;
      row.dataset.identity = String(port.identity);
      if (!dirtyVisibility) row._select.value = port.visibility;
      if (!dirtyProtocol) row._scheme.value = port.protocol;
      if (!dirtyLabel) row._name.value = port.label;
      if (!dirtyIdentity) row._identity.checked = port.identity;
      if (!dirtyVisibility && !dirtyProtocol && !dirtyLabel && !dirtyIdentity) row._save.disabled = true;
    } else {
      row._who.textContent = port.visibility;
      row._protocol.textContent = port.protocol.toUpperCase();
    }
  };

  // ------------------------------------------------------------------------------------------- share links
  const makeShareForm = (ws, section) => {
    const id = ws.id;
    const port = el("select", { id: `share-port-${id}` });
    const audience = el("select", { id: `share-audience-${id}` });
    for (const name of data.audiences) audience.append(el("option", { value: name, textContent: AUDIENCES[name] }));
    const people = el("input", { id: `share-people-${id}`, name: "people", autocomplete: "off" });
    const peopleLabel = el("span", { className: "inline" },
      el("label", { for: people.id, textContent: "People (user, e-mail, group:NAME)" }), people);
    const ttl = el("select", { id: `share-ttl-${id}` },
      el("option", { value: "1h", textContent: "1 hour" }), el("option", { value: "24h", textContent: "1 day", selected: true }),
      el("option", { value: "7d", textContent: "7 days" }));
    const showPeople = () => {
      const named = audience.value === "people";
      peopleLabel.hidden = !named; people.disabled = !named; people.required = named;
    };
    audience.addEventListener("change", showPeople); showPeople();
    const form = el("form", { className: "share" },
      el("label", { for: port.id, textContent: "Port to share" }), port,
      el("label", { for: audience.id, textContent: "Who can open it" }), audience, peopleLabel,
      el("label", { for: ttl.id, textContent: "Expires after" }), ttl,
      el("button", { type: "submit", className: "button small", textContent: "Create link" }));
    const linkField = el("input", { readOnly: true, id: `new-link-${id}` });
    const pick = el("select", { id: `new-link-port-${id}`, hidden: true, ariaLabel: "Port of the new link" });
    const extras = el("span");
    const box = el("div", { className: "linkbox", hidden: true },
      el("label", { for: linkField.id, className: "inline", textContent: "New link" }), pick, linkField,
      el("button", { type: "button", className: "button small copy", textContent: "Copy link",
                     onclick: () => copy(linkField.value, "link", linkField) }), extras);
    pick.addEventListener("change", () => { linkField.value = pick.value; });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      box.hidden = true; linkField.value = ""; extras.replaceChildren();
      const body = { audience: audience.value, ttl: ttl.value };
      if (audience.value === "people") body.people = people.value.split(",").map((s) => s.trim()).filter(Boolean);
      if (port.value) body.port = parseInt(port.value, 10);
      try {
        const link = await call("POST", `/api/v1/workspaces/${id}/shares`, body);
        tokens.set(link.id, link);
        const urls = link.urls || [{ port: link.port, url: link.url }];
        pick.replaceChildren(...urls.map((item) => el("option", { value: item.url, textContent: `port ${item.port}` })));
        pick.hidden = urls.length < 2;
        linkField.value = urls.length ? urls[0].url : "";
        if (!urls.length) toast("Link created; the workspace has no ports yet, so there is no URL to show.");
        if (link.embed) extras.append(...embedButtons(link));
        box.hidden = !urls.length;
        if (urls.length) toast("Link created");
        refreshSoon();
      } catch (error) { toast(error.message); }
    });
    section.append(el("h3", { textContent: "Share a link" }), form, box);
    return { sharePort: port };
  };

  const embedButtons = (link) => [
    el("button", { type: "button", className: "button small quiet", textContent: "Copy embed",
                   ariaLabel: `Copy the embed snippet of link ${link.id}`,
                   onclick: () => copy(link.embed.iframe, "embed snippet") }),
    el("button", { type: "button", className: "button small quiet", textContent: "Copy badge",
                   ariaLabel: `Copy the badge markdown of link ${link.id}`,
                   onclick: () => copy(link.embed.markdown, "badge markdown") })];

  const shareRow = (ws, share) => {
    const target = share.port ? `port ${share.port}` : "all ports";
    const who = share.audience === "people" ? `people: ${share.people.join(", ")}` : AUDIENCES[share.audience];
    const state = share.active ? relative(share.expires) : share.revoked ? `revoked ${relative(share.revoked)}`
      : `expired ${relative(share.expires)}`;
    const action = el("td");
    if (pendingRevokes.has(share.id)) {
      action.append(el("span", { className: "muted", textContent: "Revoking… " }), el("button", {
        type: "button", className: "button small", textContent: "Undo", ariaLabel: `Undo revoking link ${share.id}`,
        onclick: () => { clearTimeout(pendingRevokes.get(share.id)); pendingRevokes.delete(share.id); render(); } }));
    } else if (share.active && manages(ws)) {
      action.append(el("button", { type: "button", className: "button small", textContent: "Revoke",
        ariaLabel: `Revoke link ${share.id} (${target}, ${who})`, onclick: () => revoke(ws, share) }));
      if (tokens.has(share.id) && tokens.get(share.id).embed) action.append(" ", ...embedButtons(tokens.get(share.id)));
    }
    const row = el("tr", { className: share.active ? "" : "inactive" },
      el("td", { textContent: `${share.id} · ${target}` }), el("td", { textContent: who }),
      el("td", { textContent: state }), el("td", { textContent: String(share.uses) }),
      el("td", { textContent: relative(share.last_used) }), action);
    row.dataset.share = share.id;
    return row;
  };

  const revoke = (ws, share) => {
    pendingRevokes.set(share.id, setTimeout(async () => {
      pendingRevokes.delete(share.id);
      try { await call("DELETE", `/api/v1/workspaces/${ws.id}/shares/${share.id}`); toast(`Link ${share.id} revoked`); }
      catch (error) { toast(error.message); }
      refreshSoon();
    }, UNDO_MS));
    render();
  };

  // ---------------------------------------------------------------------------------------------- rendering
  let snapshot = data;
  const render = () => {
    document.getElementById("empty").hidden = snapshot.workspaces.length > 0;
    const seen = new Set();
    for (const ws of snapshot.workspaces) {
      seen.add(ws.id);
      let parts = sections.get(ws.id);
      if (!parts) { parts = makeSection(ws); sections.set(ws.id, parts); root.append(parts.section); }
      parts.ws = ws;
      parts.phase.textContent = ws.phase_words; parts.phase.dataset.phase = ws.phase;
      parts.activity.textContent = ws.last_activity ? `last used ${relative(ws.last_activity)}` : "";
      for (const button of parts.controls.querySelectorAll("button")) {
        const action = button.dataset.action;
        button.hidden = (action === "wake" && ws.phase === "RUNNING") || (action === "stop" && ws.phase !== "RUNNING")
          || (action === "archive" && ws.phase !== "WARM");
      }
      const ports = new Set();
      for (const port of ws.ports) {
        ports.add(port.port);
        let row = parts.rows.get(port.port);
        if (!row) { row = makePortRow(ws, port); parts.rows.set(port.port, row); }
        updatePortRow(ws, row, port);
      }
      for (const [number, row] of parts.rows) if (!ports.has(number)) { row.remove(); parts.rows.delete(number); }
      const ordered = [...parts.rows.keys()].sort((a, b) => a - b).map((number) => parts.rows.get(number));
      if (ordered.some((row, i) => parts.portsBody.children[i] !== row)) parts.portsBody.replaceChildren(...ordered);
      if (!ordered.length) parts.portsBody.replaceChildren(el("tr", {}, el("td", { colSpan: 7, className: "muted",
        textContent: "No ports listening yet. Start a dev server in the workspace and it appears here." })));
      if (parts.sharePort) {
        const chosen = parts.sharePort.value;
        parts.sharePort.replaceChildren(el("option", { value: "", textContent: "all ports" }),
          ...ws.ports.map((port) => el("option", { value: String(port.port),
            textContent: `port ${port.port}${port.label ? ` (${port.label})` : ""}` })));
        parts.sharePort.value = chosen;
      }
      parts.sharesBody.replaceChildren(...(ws.shares.length ? ws.shares.map((share) => shareRow(ws, share))
        : [el("tr", {}, el("td", { colSpan: 6, className: "muted", textContent: "No share links." }))]));
    }
    for (const [id, parts] of sections) if (!seen.has(id)) { parts.section.remove(); sections.delete(id); }
    const next = document.getElementById("next-page");
    next.hidden = !snapshot.next_cursor;
    if (snapshot.next_cursor) next.href = `/?cursor=${encodeURIComponent(snapshot.next_cursor)}`;
  };
  // This page's workspaces (its ?cursor= and ?limit=): the same page in every snapshot it asks for or is sent.
  const thisPage = location.search;
  const fresh = (answer) => ({ ...snapshot, workspaces: answer.workspaces, next_cursor: answer.next_cursor });

  let refreshTimer = 0;
  const refreshSoon = () => {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(async () => {
      try { snapshot = fresh(await call("GET", `/api/v1/hub/snapshot${thisPage}`)); render(); }
      catch (error) { toast(error.message); }
    }, 50);
  };

  render();
  const events = new EventSource(`/api/v1/hub/events${thisPage}`);
  events.addEventListener("snapshot", (event) => {
    snapshot = fresh(JSON.parse(event.data));
    render();
  });
  setInterval(render, 30000); // relative times age
  for (const cell of document.querySelectorAll(".consents .when")) {
    cell.textContent = new Date(parseFloat(cell.dataset.t) * 1000).toLocaleString();
  }
  for (const button of document.querySelectorAll("button.withdraw")) {
    button.addEventListener("click", async () => {
      try { await call("DELETE", `/api/v1/consents/${button.dataset.consent}`); location.reload(); }
      catch (error) { toast(error.message); }
    });
  }
})();
