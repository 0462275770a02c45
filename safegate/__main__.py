import sys

from safegate.cli.fastpath import main

sys.exit(main())
