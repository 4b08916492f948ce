import sys

if sys.argv[1:2] == ["soak"]:
    from bench.soak import main as soak

    sys.exit(soak(sys.argv[2:]))

from bench.run import main

sys.exit(main())
