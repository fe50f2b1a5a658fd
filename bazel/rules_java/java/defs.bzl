"""Offline stand-in for @rules_java//java:defs.bzl (Bazel 4.2).

Bazel 4 registers the Java toolchains of `@bazel_tools//tools/jdk` by default, and loading that
package (toolchain resolution does, even for Python targets) loads this file, which Bazel would
download. The real file only forwards to Bazel's native Java rules, as these do.
"""

def java_binary(**attrs):
    native.java_binary(**attrs)

def java_import(**attrs):
    native.java_import(**attrs)

def java_library(**attrs):
    native.java_library(**attrs)

def java_proto_library(**attrs):
    native.java_proto_library(**attrs)

def java_runtime(**attrs):
    native.java_runtime(**attrs)

def java_toolchain(**attrs):
    native.java_toolchain(**attrs)
