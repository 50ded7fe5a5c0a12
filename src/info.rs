//! `qbackup info`: what qemu-img info says about one image, or with
//! `--backing-chain` about each image of its chain (top first), with the
//! same JSON keys.

use std::fmt::Write as _;
use std::path::Path;

use qbackup_formats::image::{self, ImageError};
use qbackup_formats::layer::Layer;
use qbackup_formats::open::{resolve_backing, Opener, Role};
use qbackup_formats::{Chain, Format};
use serde_json::{json, Map, Value};

/// Builds the `qemu-img info --output=json` object for `path`, opened
/// through `opener`.
pub fn info_json(
    opener: &dyn Opener,
    path: &Path,
    format: Option<Format>,
) -> Result<Value, ImageError> {
    let layer = image::open(opener, path, Role::Image, format)?;
    layer_json(layer.as_ref(), path)
}

/// `qemu-img info --backing-chain --output=json`: one object per image of
/// the chain, top first. The chain is opened whole first, so a missing
/// backing file or a loop fails the command as it fails `map`.
pub fn chain_json(
    opener: &dyn Opener,
    path: &Path,
    format: Option<Format>,
) -> Result<Vec<Value>, ImageError> {
    let chain = Chain::open_with(opener, path, format)?;
    chain
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| layer_json(l.as_ref(), if i == 0 { path } else { l.path() }))
        .collect()
}

/// The info object of one opened image; `path` is its name as given (for
/// resolving its backing file's name).
fn layer_json(layer: &dyn Layer, path: &Path) -> Result<Value, ImageError> {
    let info = layer.info()?;
    let mut m = Map::new();
    let backing = info.backing.as_ref();
    if let Some(fmt) = backing.and_then(|b| b.format.as_ref()) {
        m.insert("backing-filename-format".into(), json!(fmt));
    }
    m.insert("virtual-size".into(), json!(info.virtual_size));
    // The name the storage goes by: the path as given, or an NBD export's
    // URI as QEMU normalises it.
    m.insert("filename".into(), json!(layer.path().display().to_string()));
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), json!(cs.bytes()));
    }
    m.insert("format".into(), json!(info.format.name()));
    if let Some(actual) = info.actual_size {
        m.insert("actual-size".into(), json!(actual));
    }
    if let Some(q) = &info.qcow2 {
        if q.encrypted {
            m.insert("encrypted".into(), json!(true));
        }
        let mut data = Map::new();
        data.insert("compat".into(), json!(q.compat()));
        if q.version == 2 {
            data.insert("compression-type".into(), json!(q.compression.name()));
            data.insert("refcount-bits".into(), json!(q.refcount_bits));
        } else {
            data.insert("compression-type".into(), json!(q.compression.name()));
            data.insert("lazy-refcounts".into(), json!(q.lazy_refcounts));
            if !q.bitmaps.is_empty() {
                let list: Vec<Value> = q
                    .bitmaps
                    .iter()
                    .map(|b| {
                        let mut f = Vec::new();
                        if b.in_use {
                            f.push("in-use");
                        }
                        if b.auto {
                            f.push("auto");
                        }
                        json!({"flags": f, "name": b.name, "granularity": b.granularity})
                    })
                    .collect();
                data.insert("bitmaps".into(), Value::Array(list));
            }
            data.insert("refcount-bits".into(), json!(q.refcount_bits));
            data.insert("corrupt".into(), json!(q.corrupt));
            data.insert("extended-l2".into(), json!(q.extended_l2));
            if let Some(df) = &q.data_file {
                data.insert("data-file".into(), json!(df));
            }
            if let Some(raw) = q.data_file_raw {
                data.insert("data-file-raw".into(), json!(raw));
            }
        }
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": data}),
        );
        if let Some(b) = backing {
            let full = resolve_backing(path, &b.name);
            m.insert(
                "full-backing-filename".into(),
                json!(full.display().to_string()),
            );
            m.insert("backing-filename".into(), json!(b.name));
        }
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Ok(Value::Object(m))
}

/// qemu-img's size_to_str: three significant digits and a binary unit.
fn size_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut f = v as f64;
    while f >= 1024.0 && i + 1 < UNITS.len() {
        f /= 1024.0;
        i += 1;
    }
    if i == 0 {
        return format!("{v} B");
    }
    let digits = if f < 10.0 {
        2
    } else if f < 100.0 {
        1
    } else {
        0
    };
    let s = format!("{f:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

/// Renders the JSON object as qemu-img's human-readable text.
pub fn info_human(v: &Value) -> String {
    let get = |k: &str| v.get(k);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "image: {}",
        get("filename").and_then(Value::as_str).unwrap_or("")
    );
    let _ = writeln!(
        s,
        "file format: {}",
        get("format").and_then(Value::as_str).unwrap_or("")
    );
    let vs = get("virtual-size").and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(s, "virtual size: {} ({vs} bytes)", size_str(vs));
    match get("actual-size").and_then(Value::as_u64) {
        Some(actual) => {
            let _ = writeln!(s, "disk size: {}", size_str(actual));
        }
        None => {
            let _ = writeln!(s, "disk size: unavailable");
        }
    }
    if let Some(cs) = get("cluster-size").and_then(Value::as_u64) {
        let _ = writeln!(s, "cluster_size: {cs}");
    }
    if get("encrypted").is_some() {
        let _ = writeln!(s, "encrypted: yes");
    }
    if let Some(b) = get("backing-filename").and_then(Value::as_str) {
        let full = get("full-backing-filename")
            .and_then(Value::as_str)
            .unwrap_or(b);
        if full != b {
            let _ = writeln!(s, "backing file: {b} (actual path: {full})");
        } else {
            let _ = writeln!(s, "backing file: {b}");
        }
    }
    if let Some(f) = get("backing-filename-format").and_then(Value::as_str) {
        let _ = writeln!(s, "backing file format: {f}");
    }
    if let Some(data) = get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(Value::as_object)
    {
        let _ = writeln!(s, "Format specific information:");
        for (k, val) in data {
            human_value(&mut s, 1, &k.replace('-', " "), val);
        }
    }
    s
}

fn human_value(s: &mut String, indent: usize, key: &str, v: &Value) {
    let pad = "    ".repeat(indent);
    match v {
        Value::Array(items) => {
            let _ = writeln!(s, "{pad}{key}:");
            for (i, item) in items.iter().enumerate() {
                human_value(s, indent + 1, &format!("[{i}]"), item);
            }
        }
        Value::Object(map) => {
            let _ = writeln!(s, "{pad}{key}:");
            for (k, val) in map {
                human_value(s, indent + 1, k, val);
            }
        }
        Value::String(t) => {
            let _ = writeln!(s, "{pad}{key}: {t}");
        }
        other => {
            let _ = writeln!(s, "{pad}{key}: {other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_str;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_str(8 << 20), "8 MiB");
        assert_eq!(size_str(225280), "220 KiB");
        assert_eq!(size_str(512), "512 B");
        assert_eq!(size_str(1536 << 20), "1.5 GiB");
    }
}
