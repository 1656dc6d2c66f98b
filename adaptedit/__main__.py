from adaptedit.cli import main

main()
