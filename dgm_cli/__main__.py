from dgm_cli.cli import main

main()
