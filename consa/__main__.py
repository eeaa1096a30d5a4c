"""`python -m consa ...` (and `torchrun ... -m consa search ...`): the `consa` command line."""

from consa.cli import main

raise SystemExit(main())
