"""Tests of the package's public names."""

import ghn_jax


def test_every_public_name_resolves():
  for name in ghn_jax.__all__:
    assert getattr(ghn_jax, name) is not None, name


def test_unknown_name_raises_attribute_error():
  try:
    ghn_jax.no_such_name  # noqa: B018 - the lookup is what is tested.
  except AttributeError as error:
    assert "no_such_name" in str(error)
  else:
    raise AssertionError("ghn_jax.no_such_name did not raise")


def test_exported_primitives_are_the_ghn2_order():
  assert ghn_jax.PRIMITIVES[0] == "max_pool"
  assert ghn_jax.PRIMITIVES[-1] == "glob_avg"
  assert len(ghn_jax.PRIMITIVES) == 15
