terraform {
  required_version = ">= 1.5.0"

  # No provider: the module only renders files, so it can be evaluated offline.
  required_providers {}
}
