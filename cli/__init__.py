"""`tuneserve`: the command line client of the tuneserve API (HTTP only; it never touches the database)."""
