import sys

from dfka.cli import main

sys.exit(main())
