from memmcl.cli import main

main()
