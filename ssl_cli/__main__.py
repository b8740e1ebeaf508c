from ssl_cli.cli import main

main()
