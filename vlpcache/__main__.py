from vlpcache.cli import main

main()
