//! NNEF forms for the three quantisation ops that tract 0.23 can run but not write: the
//! int8 model (`models/quantize.py --qlinearconv`) keeps a `QuantizeLinear` in front of
//! its convolutions, a `DequantizeLinear` after some, and the lookup tables tract folds
//! `DequantizeLinear → LeakyRelu → QuantizeLinear` into. With these it can be written as
//! NNEF (`deskcam model export-nnef`) and loaded by the board build, which has no ONNX
//! front end. The ops are written as they are, with their parameters: loading gives the
//! same ops back, so the model computes exactly what its ONNX form does.

use std::any::TypeId;

use tract_nnef::internal::*;
use tract_nnef::ser::{invocation, numeric};
use tract_nnef::tract_core::ops::element_wise::ElementWiseOp;
use tract_nnef::tract_core::ops::quant::{lookup_table, DequantizeLinearF32, LookupTable, QuantizeLinearI8};

/// The registry to add to tract's NNEF framework for writing and for reading.
pub fn registry() -> Registry {
    let mut r = Registry::new("deskcam_quant").with_doc(
        "deskcam: int8 quantise, dequantise and lookup-table ops (tract's own, written as they are)",
    );
    r.register_element_wise(
        "deskcam_quantize_i8",
        TypeId::of::<QuantizeLinearI8>(),
        Box::new(dump_quantize),
        vec![
            TypeName::Scalar.tensor().named("input"),
            TypeName::Scalar.named("scale"),
            TypeName::Integer.named("zero_point"),
        ],
        load_quantize,
    );
    r.register_element_wise(
        "deskcam_lookup_table",
        TypeId::of::<LookupTable>(),
        Box::new(dump_lookup_table),
        vec![TypeName::Integer.tensor().named("input"), TypeName::Integer.tensor().named("table")],
        load_lookup_table,
    );
    r.register_dumper(dump_dequantize);
    r.register_primitive(
        "deskcam_dequantize_f32",
        &[
            TypeName::Integer.tensor().named("input"),
            TypeName::Scalar.named("scale"),
            TypeName::Integer.named("zero_point"),
        ],
        &[("output", TypeName::Scalar.tensor())],
        load_dequantize,
    );
    r
}

fn mini_op<O: ElementWiseMiniOp>(node: &TypedNode) -> TractResult<&O> {
    node.op_as::<ElementWiseOp>()
        .and_then(|e| e.0.downcast_ref::<O>())
        .ok_or_else(|| format_err!("node {} is not the element-wise op it was registered for", node.name))
}

/// `id(input, scale = .., zero_point = ..)`: the form of both scaled ops.
fn dump_scaled(
    ast: &mut IntoAst,
    node: &TypedNode,
    id: &str,
    scale: f32,
    zero_point: i32,
) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(id, &[input], &[("scale", numeric(scale)), ("zero_point", numeric(zero_point))])))
}

/// The input, scale and zero point of a scaled op (the zero point checked to fit `Z`).
fn load_scaled<Z: TryFrom<i64>>(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
) -> TractResult<(OutletId, f32, Z)> {
    let input = invocation.named_arg_as(builder, "input")?;
    let scale: f32 = invocation.named_arg_as(builder, "scale")?;
    let zero_point: i64 = invocation.named_arg_as(builder, "zero_point")?;
    let z = Z::try_from(zero_point).map_err(|_| format_err!("zero point {zero_point} out of range"))?;
    Ok((input, scale, z))
}

fn dump_quantize(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let op = mini_op::<QuantizeLinearI8>(node)?;
    dump_scaled(ast, node, "deskcam_quantize_i8", op.scale, op.zero_point.into())
}

fn load_quantize(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let (input, scale, zero_point) = load_scaled::<i8>(builder, invocation)?;
    builder.wire(ElementWiseOp(Box::new(QuantizeLinearI8 { scale, zero_point }), None), &[input])
}

fn dump_lookup_table(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let op = mini_op::<LookupTable>(node)?;
    let input = ast.mapping[&node.inputs[0]].clone();
    let table = ast.konst(format!("{}_table", node.name), &Arc::new(tensor1(op.table.table())))?;
    Ok(Some(invocation("deskcam_lookup_table", &[input, table], &[])))
}

fn load_lookup_table(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let input = invocation.named_arg_as(builder, "input")?;
    let table: Arc<Tensor> = invocation.named_arg_as(builder, "table")?;
    let table = table.try_as_plain_ram()?.as_slice::<u8>()?.to_vec();
    if table.len() != 256 {
        bail!("a lookup table of {} entries (256 expected)", table.len());
    }
    let op = lookup_table(tract_linalg::routines::lut_u8(&table)?);
    builder.wire(op, &[input])
}

fn dump_dequantize(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &DequantizeLinearF32,
) -> TractResult<Option<Arc<RValue>>> {
    dump_scaled(ast, node, "deskcam_dequantize_f32", op.scale, op.zero_point)
}

fn load_dequantize(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let (input, scale, zero_point) = load_scaled::<i32>(builder, invocation)?;
    builder.wire(DequantizeLinearF32::new(scale, zero_point), &[input])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// quantise → lookup table → dequantise, written as NNEF with this registry and read
    /// back: the same ops, the same numbers.
    #[test]
    fn the_quantisation_ops_survive_an_nnef_round_trip() -> TractResult<()> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 8]))?;
        let q = ElementWiseOp(Box::new(QuantizeLinearI8 { scale: 10.0, zero_point: 3 }), None);
        let q = model.wire_node("q", q, &[x])?;
        // A table no arithmetic op would give: each byte reversed.
        let table: Vec<u8> = (0..=255u8).map(u8::reverse_bits).collect();
        let lut = model.wire_node("lut", lookup_table(tract_linalg::routines::lut_u8(&table)?), &q)?;
        let y = model.wire_node("dq", DequantizeLinearF32::new(0.1, 3), &lut)?;
        model.select_output_outlets(&y)?;

        let nnef = tract_nnef::nnef().with_registry(registry());
        let mut tar = Vec::new();
        nnef.write_to_tar(&model, &mut tar)?;
        let back = nnef.model_for_read(&mut tar.as_slice())?;
        let ops: Vec<String> = back.nodes().iter().map(|n| n.op().name().to_string()).collect();
        assert!(ops.iter().any(|o| o.contains("DequantizeLinearF32")), "{ops:?}");

        let input = tensor2(&[[-12.8f32, -1.0, -0.31, 0.0, 0.05, 0.26, 1.0, 12.7]]);
        let run = |m: TypedModel| -> TractResult<Tensor> {
            let out = m.into_runnable()?.run(tvec!(input.clone().into()))?;
            Ok(out[0].clone().into_tensor())
        };
        let (a, b) = (run(model)?, run(back)?);
        assert_eq!(a, b);
        // And the numbers are the ops' own: x → round(10x) + 3 → reversed bits → (q - 3) / 10.
        let expected: Vec<f32> = [-12.8f32, -1.0, -0.31, 0.0, 0.05, 0.26, 1.0, 12.7]
            .iter()
            .map(|x| {
                let q = ((x * 10.0).round_ties_even() as i32 + 3).clamp(-128, 127) as i8;
                let t = table[q as u8 as usize] as i8;
                (i32::from(t) - 3) as f32 * 0.1
            })
            .collect();
        assert_eq!(a.try_as_plain_ram()?.as_slice::<f32>()?, expected.as_slice());
        Ok(())
    }
}
