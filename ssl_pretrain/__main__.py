import sys

from ssl_pretrain.cli import main

sys.exit(main())
