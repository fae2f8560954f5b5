#!/bin/sh
# Build and run the sample program.
set -e
make -s hello && ./hello
