import sys

from safegate.fastpath import main

sys.exit(main())
