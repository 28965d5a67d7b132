from editrl.cli import main

main()
