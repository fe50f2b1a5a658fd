"""Offline stand-in for @rules_cc//cc:defs.bzl (Bazel 4.2).

Bazel 4 loads `@rules_cc//cc:defs.bzl` from its own C++ toolchain package, which every
py_binary/py_test depends on, and would download rules_cc for that. The real file only
forwards to Bazel's native C++ rules, so these few forwards are all that is needed.
"""

def cc_binary(**attrs):
    native.cc_binary(**attrs)

def cc_import(**attrs):
    native.cc_import(**attrs)

def cc_library(**attrs):
    native.cc_library(**attrs)

def cc_test(**attrs):
    native.cc_test(**attrs)

def cc_toolchain(**attrs):
    native.cc_toolchain(**attrs)

def cc_toolchain_suite(**attrs):
    native.cc_toolchain_suite(**attrs)

def cc_proto_library(**attrs):
    native.cc_proto_library(**attrs)

def objc_library(**attrs):
    native.objc_library(**attrs)
