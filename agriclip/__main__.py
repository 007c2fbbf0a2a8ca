"""`python -m agriclip` runs the `agriclip` command."""

import sys

from agriclip.cli import main


sys.exit(main())
