import sys

from rho1.cli import main

sys.exit(main())
