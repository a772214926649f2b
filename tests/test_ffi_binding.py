"""The FFI handlers' bindings (src/ffi/handlers.cc) against the custom calls the cuda lowering emits.

XLA checks a call against its handler's binding only when it runs, on a GPU: an operand, result or attribute
added on one side alone would fail every GPU test of the next session, and CI has no GPU. This reads the
bindings from the C++ source and compares them, in order and element type, with the lowered custom calls.
"""

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import jax_flashmla as jfm

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "ffi"
BUFFER_TYPES = {"ffi::Buffer<ffi::S32>": "i32", "ffi::Buffer<ffi::F32>": "f32", "ffi::AnyBuffer": None}
ATTRIBUTE_TYPES = {"float": r"-?[0-9.e+-]+ : f32", "bool": r"true|false", "int32_t": r"-?[0-9]+ : i32"}


def without_comments(source: str) -> str:
    """C++ source with its comments blanked: a commented-out binding step must not count."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)


def bindings() -> dict:
    """Target name -> {"args": [element type or None], "rets": [...], "attrs": {name: C++ type},
    "params": the handler function's parameter names in order (the stream first)}."""
    handlers = without_comments((SRC / "handlers.cc").read_text())
    symbols = dict(re.findall(r'targets\["(\w+)"\]\s*=\s*nb::capsule\(reinterpret_cast<void\*>\((\w+)\)\)',
                              without_comments((SRC / "module.cc").read_text())))
    found = {}
    for symbol, impl, chain in re.findall(
            r"XLA_FFI_DEFINE_HANDLER_SYMBOL\((\w+),\s*(?:\w+::)*(\w+),\s*ffi::Ffi::Bind\(\)(.*?),\s*\{", handlers, re.S):
        steps = re.findall(r'\.(Arg|Ret|Attr|Ctx)<((?:[^<>]|<[^<>]*>)*)>(?:\("(\w+)"\))?', chain)
        signature, = re.findall(rf"ffi::Error {impl}\((.*?)\)\s*\{{", handlers, re.S)
        found[symbol] = {"args": [BUFFER_TYPES[t] for kind, t, _ in steps if kind == "Arg"],
                         "rets": [BUFFER_TYPES[t] for kind, t, _ in steps if kind == "Ret"],
                         "attrs": {name: t for kind, t, name in steps if kind == "Attr"},
                         "params": [param.split()[-1] for param in signature.split(",")]}
        assert len(found[symbol]["params"]) == len(steps), (symbol, found[symbol]["params"], steps)
    assert sorted(symbols.values()) == sorted(found), (symbols, found)
    return {target: found[symbol] for target, symbol in symbols.items()}


def lowered_calls() -> dict:
    """Target name -> (operand element types, result element types, backend_config text) of a cuda lowering."""
    args = (jax.ShapeDtypeStruct((2, 2, 16, 576), jnp.bfloat16), jax.ShapeDtypeStruct((9, 64, 1, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 5), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))

    def step(q, k_cache, table, seqlens):
        md, splits = jfm.get_mla_metadata(seqlens, 32, 1, num_sms=8)
        return jfm.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, md, splits, causal=True)

    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = {}
    for target, config, operands, results in re.findall(
            r"stablehlo\.custom_call @(\w+)\(.*?mhlo\.backend_config = \{(.*?)\}.*? : \((.*?)\) -> \(?(.*?)\)?$",
            text, re.M):
        element = lambda types: [shape.rsplit("x", 1)[-1] for shape in re.findall(r"tensor<([^>]*)>", types)]
        calls[target] = (element(operands), element(results), config)
    return calls


def test_handler_parameters_follow_the_primitives_operands():
    """Element types cannot tell two int32 operands apart: the handlers' parameter names, in binding order, must be
    the primitives' operand names, and their trailing ones the attribute names."""
    from jax_flashmla import primitives

    found = bindings()
    for target, abstract_eval in (("jax_flashmla_mla_metadata", primitives._metadata_abstract_eval),
                                  ("jax_flashmla_mla_decode", primitives._decode_abstract_eval)):
        operands = [name for name, param in inspect.signature(abstract_eval).parameters.items()
                    if param.kind is param.POSITIONAL_OR_KEYWORD]
        binding = found[target]
        params = binding["params"][1:]  # after the stream
        assert params[:len(operands)] == operands, (target, params, operands)
        if binding["attrs"]:
            assert params[-len(binding["attrs"]):] == list(binding["attrs"]), (target, params, binding["attrs"])


@pytest.mark.skipif(not jfm.kernels_built(), reason="the cuda lowering needs the CUDA extension built")
def test_bindings_match_the_lowered_custom_calls():
    expected, calls = bindings(), lowered_calls()
    assert sorted(calls) == sorted(expected), (sorted(calls), sorted(expected))
    for target, binding in expected.items():
        operands, results, config = calls[target]
        for what, declared, lowered in (("operands", binding["args"], operands), ("results", binding["rets"], results)):
            assert len(declared) == len(lowered), f"{target}: {len(declared)} {what} bound, {len(lowered)} lowered"
            for i, (want, got) in enumerate(zip(declared, lowered)):
                assert want is None or want == got, f"{target} {what}[{i}]: bound {want}, lowered {got}"
        lowered_attrs = dict(re.findall(r"(\w+) = ([^,]+)", config))
        assert sorted(lowered_attrs) == sorted(binding["attrs"]), (target, lowered_attrs, binding["attrs"])
        for name, cxx_type in binding["attrs"].items():
            assert re.fullmatch(ATTRIBUTE_TYPES[cxx_type], lowered_attrs[name].strip()), (target, name, cxx_type)


def test_the_binding_parser_reads_every_handler():
    """The parse itself, without the extension: both targets, and the decode's known arity."""
    found = bindings()
    assert sorted(found) == ["jax_flashmla_mla_decode", "jax_flashmla_mla_metadata"]
    assert found["jax_flashmla_mla_metadata"] == {"args": ["i32"], "rets": ["i32", "i32"],
                                                  "attrs": {"split_overhead": "int32_t"},
                                                  "params": ["stream", "cache_seqlens", "tile_metadata", "num_splits",
                                                             "split_overhead"]}
    decode = found["jax_flashmla_mla_decode"]
    assert decode["args"] == [None, None, "i32", "i32", "i32", "i32", "i32"]
    assert decode["attrs"] == {"softmax_scale": "float", "causal": "bool", "poison_outputs": "bool"}
    assert decode["rets"] == [None, "f32", "f32", "f32"]
