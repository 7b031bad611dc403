from worldmodels.cli import main

main()
