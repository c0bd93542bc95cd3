import sys

from swav_fast.cli import main

sys.exit(main())
