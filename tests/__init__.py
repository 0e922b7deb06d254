"""Tests of the contact example, and the `make demo` script that shares their helpers."""
