"""Survey readers and the embedded data set: real files in, TokenTables of named tokens out."""
