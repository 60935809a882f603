from kasou.cli.main import main

main()
