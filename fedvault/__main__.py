from fedvault.app.cli import main

main()
