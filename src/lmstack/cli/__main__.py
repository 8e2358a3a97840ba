import sys

from lmstack.cli.main import main

sys.exit(main())
