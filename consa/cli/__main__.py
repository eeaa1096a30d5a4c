from consa.cli import main

raise SystemExit(main())
