"""The commands: convert, verify, repair, build, inspect, package. The only code that commits to a bundle; each is
one public function, also exported as ``mpexport.<command>``."""
