from hybridtune.cli import main

main()
