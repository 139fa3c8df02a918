import sys

from prefrank.cli import main

sys.exit(main())
