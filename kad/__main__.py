from kad.cli import main

main()
