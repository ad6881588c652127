from fedvault.cli import main

main()
