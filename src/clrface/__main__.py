import sys

from clrface.cli import main

sys.exit(main())
