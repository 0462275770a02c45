import sys

from safegate.cli import main

sys.exit(main())
