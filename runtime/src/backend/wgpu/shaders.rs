//! The WGSL sources (in `shaders/`) and the small preprocessor that assembles them:
//! `#include "name"` splices a shared snippet (each kept in one file, never copied),
//! `#if NAME` / `#else` / `#endif` pick the adapter's variant (`F16`, `SUBGROUP`).
//! naga rejects `enable subgroups;`, so the subgroup variant only uses the built-ins
//! (the device was created with the feature); `enable f16;` is prepended for `F16`.

use cairn_formats::GgmlType;

fn snippet(name: &str) -> Option<&'static str> {
    Some(match name {
        "common" => include_str!("../../../../shaders/common.wgsl"),
        "bytes" => include_str!("../../../../shaders/bytes.wgsl"),
        "reduce" => include_str!("../../../../shaders/reduce.wgsl"),
        "kv" => include_str!("../../../../shaders/kv.wgsl"),
        "matmul" => include_str!("../../../../shaders/matmul.wgsl"),
        "embed" => include_str!("../../../../shaders/embed.wgsl"),
        "norm" => include_str!("../../../../shaders/norm.wgsl"),
        "rope" => include_str!("../../../../shaders/rope.wgsl"),
        "elementwise" => include_str!("../../../../shaders/elementwise.wgsl"),
        "attention" => include_str!("../../../../shaders/attention.wgsl"),
        "bitstack" => include_str!("../../../../shaders/bitstack.wgsl"),
        "blocks" => include_str!("../../../../shaders/quant/blocks.wgsl"),
        "fine" => include_str!("../../../../shaders/quant/fine.wgsl"),
        "q4_0" => include_str!("../../../../shaders/quant/q4_0.wgsl"),
        "q4_1" => include_str!("../../../../shaders/quant/q4_1.wgsl"),
        "q5_0" => include_str!("../../../../shaders/quant/q5_0.wgsl"),
        "q5_1" => include_str!("../../../../shaders/quant/q5_1.wgsl"),
        "q8_0" => include_str!("../../../../shaders/quant/q8_0.wgsl"),
        "q4_k" => include_str!("../../../../shaders/quant/q4_k.wgsl"),
        "q6_k" => include_str!("../../../../shaders/quant/q6_k.wgsl"),
        "f16" => include_str!("../../../../shaders/quant/f16.wgsl"),
        "f32" => include_str!("../../../../shaders/quant/f32.wgsl"),
        _ => return None,
    })
}

/// The block decoder snippet of a weight storage type, if the backend has one.
pub fn quant_snippet(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q6K => "q6_k",
        GgmlType::F16 => "f16",
        GgmlType::F32 => "f32",
        // Width, symmetry and group size are the pipeline's override constants.
        GgmlType::Fine(_) => "fine",
        _ => return None,
    })
}

/// The source of `main` with its includes resolved (`quant` names the block decoder)
/// and conditionals evaluated against `defs`.
pub fn assemble(main: &str, quant: Option<&str>, defs: &[&str]) -> Result<String, String> {
    let mut out = String::new();
    if defs.contains(&"F16") {
        out.push_str("enable f16;\n");
    }
    splice(main, quant, defs, &mut out, 0)?;
    Ok(out)
}

fn splice(name: &str, quant: Option<&str>, defs: &[&str], out: &mut String, depth: usize) -> Result<(), String> {
    if depth > 8 {
        return Err(format!("shader include cycle at {name}"));
    }
    let name = if name == "quant" { quant.ok_or("this shader needs a block decoder")? } else { name };
    let src = snippet(name).ok_or_else(|| format!("no shader snippet {name:?}"))?;
    // Each entry: (this branch taken, some enclosing branch is off).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(on, outer_off)| on && !outer_off);
    for line in src.lines() {
        let t = line.trim();
        if let Some(def) = t.strip_prefix("#if ") {
            let outer_off = !active(&stack);
            stack.push((defs.contains(&def.trim()), outer_off));
        } else if t == "#else" {
            let top = stack.last_mut().ok_or_else(|| format!("{name}: #else without #if"))?;
            top.0 = !top.0;
        } else if t == "#endif" {
            stack.pop().ok_or_else(|| format!("{name}: #endif without #if"))?;
        } else if !active(&stack) {
        } else if let Some(inc) = t.strip_prefix("#include ") {
            splice(inc.trim().trim_matches('"'), quant, defs, out, depth + 1)?;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(format!("{name}: unterminated #if"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_and_conditionals() {
        let with = assemble("matmul", Some("q4_0"), &["SUBGROUP"]).unwrap();
        assert!(with.contains("subgroupAdd") && with.contains("const BB: u32 = 18u;"));
        assert!(!with.lines().any(|l| l.trim_start().starts_with('#')) && !with.contains("enable f16"));
        let without = assemble("matmul", Some("q6_k"), &["F16"]).unwrap();
        assert!(without.starts_with("enable f16;") && !without.contains("subgroupAdd"));
        assert!(without.contains("f32(f16(x))") && without.contains("const BB: u32 = 210u;"));
        assert!(assemble("matmul", None, &[]).is_err());
        let matvec = assemble("matmul", Some("q4_1"), &["MATVEC"]).unwrap();
        assert!(matvec.contains("const TR: u32 = 8u;") && !matvec.contains("const TR: u32 = 4u;"));
        // ggml types locate blocks through the shared snippet; FineQuant has its own `dq4`.
        assert_eq!(with.matches("fn dq4(").count(), 1);
        let fine = assemble("matmul", Some("fine"), &[]).unwrap();
        assert!(fine.contains("override FQ_GROUP: u32;") && fine.matches("fn dq4(").count() == 1);
        assert!(!fine.contains("dq4_block"));
        assert!(assemble("bitstack", None, &["MATVEC"]).unwrap().contains("const TT: u32 = 1u;"));
    }
}
