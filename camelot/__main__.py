import sys

from camelot.cli import main

sys.exit(main())
