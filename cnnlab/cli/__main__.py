"""`python -m cnnlab.cli`: the `cnnlab` command."""

from cnnlab.cli.main import main

main()
