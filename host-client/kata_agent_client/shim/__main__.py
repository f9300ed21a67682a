import sys

from kata_agent_client.shim.cli import main

sys.exit(main())
