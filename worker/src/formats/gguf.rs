//! A reader of GGUF files (llama.cpp's model container, version 2 and 3): the header,
//! the metadata (typed key/value pairs: model shape, tokenizer, chat template) and the
//! tensor index, then any tensor read on demand and dequantized to f32.
//!
//! Written from the format's public description (ggml's `docs/gguf.md`) for the types
//! SmolLM2's file holds: F32, F16, Q8_0 and Q4_1. Every length and count the file
//! declares is bounded before it is allocated, and every tensor must lie inside the file.
//! Values come out in GGUF's order: `ne[0]` (a row of a weight matrix) varies fastest.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::models::ModelError;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest string the reader accepts (a chat template is a few KB; a token, bytes).
const MAX_STRING: u64 = 1 << 24;
/// Most elements in one metadata array (a vocabulary, its merges).
const MAX_ARRAY: u64 = 1 << 24;
const MAX_TENSORS: u64 = 1 << 16;
const MAX_KEYS: u64 = 1 << 16;
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer that fits an u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// How a tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    /// Blocks of 32: an f16 scale and 32 signed bytes.
    Q8_0,
    /// Blocks of 32: an f16 scale and minimum and 32 four-bit values.
    Q4_1,
}

impl GgmlType {
    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            _ => return None,
        })
    }

    /// ggml's name for the type, e.g. `Q4_1`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_1 => "Q4_1",
        }
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_1 => (32, 20),
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (`ne[0]` is a row's length).
    pub ne: Vec<u64>,
    pub kind: GgmlType,
    /// Byte offset from the start of the data section.
    offset: u64,
    bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// An open GGUF file: metadata and tensor index in memory, tensor data read on demand.
pub struct Gguf {
    path: PathBuf,
    file: File,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data_start: u64,
}

fn bad(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Load(format!("{}: {message}", path.display()))
}

/// Reads the header and index in order, counting bytes.
struct Header<'a> {
    path: &'a Path,
    r: BufReader<&'a File>,
    pos: u64,
}

impl Header<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| bad(self.path, format!("truncated header at byte {}: {e}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count the file declares, refused past `max`.
    fn count(&mut self, what: &str, max: u64) -> Result<u64, ModelError> {
        let n = self.u64()?;
        if n > max {
            return Err(bad(
                self.path,
                format!("{what} of {n} is over the limit of {max}"),
            ));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let len = self.count("a string length", MAX_STRING)?;
        let mut buf = vec![0u8; len as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| bad(self.path, format!("truncated string at byte {}: {e}", self.pos)))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|e| bad(self.path, format!("a string is not UTF-8: {e}")))
    }

    fn value(&mut self, kind: u32, depth: u8) -> Result<Value, ModelError> {
        Ok(match kind {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 if depth == 0 => {
                let elem = self.u32()?;
                let n = self.count("an array length", MAX_ARRAY)?;
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(bad(self.path, format!("unknown or nested metadata type {other}"))),
        })
    }
}

impl Gguf {
    /// Reads the header, the metadata and the tensor index of `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| bad(path, e))?;
        let file_len = file.metadata().map_err(|e| bad(path, e))?.len();
        let mut h = Header {
            path,
            r: BufReader::new(&file),
            pos: 0,
        };
        if &h.bytes::<4>()? != MAGIC {
            return Err(bad(path, "not a GGUF file (bad magic)"));
        }
        let version = h.u32()?;
        if !(2..=3).contains(&version) {
            return Err(bad(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = h.count("the tensor count", MAX_TENSORS)?;
        let n_keys = h.count("the metadata count", MAX_KEYS)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_keys {
            let key = h.string()?;
            let kind = h.u32()?;
            let value = h.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = h.string()?;
            let n_dims = h.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(path, format!("tensor {name:?} has {n_dims} dimensions")));
            }
            let ne = (0..n_dims).map(|_| h.u64()).collect::<Result<Vec<_>, _>>()?;
            let code = h.u32()?;
            let kind = GgmlType::from_code(code)
                .ok_or_else(|| bad(path, format!("tensor {name:?} has unsupported ggml type {code}")))?;
            let offset = h.u64()?;
            let elements = ne
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad(path, format!("tensor {name:?}: shape {ne:?} overflows")))?;
            let (per_block, block_bytes) = kind.block();
            if elements % per_block != 0 {
                return Err(bad(
                    path,
                    format!("tensor {name:?}: {elements} elements are not whole blocks"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                ne,
                kind,
                offset,
                bytes: elements / per_block * block_bytes,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = h.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            if end.is_none_or(|end| end > file_len) {
                return Err(bad(
                    path,
                    format!("tensor {:?} lies past the end of the file", t.name),
                ));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A metadata value that must be there, as an integer.
    pub fn require_u64(&self, key: &str) -> Result<u64, ModelError> {
        self.metadata(key).and_then(Value::as_u64).ok_or_else(|| {
            bad(
                &self.path,
                format!("metadata {key:?} is missing or not an integer"),
            )
        })
    }

    /// A metadata value that must be there, as a number.
    pub fn require_f64(&self, key: &str) -> Result<f64, ModelError> {
        self.metadata(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(&self.path, format!("metadata {key:?} is missing or not a number")))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| bad(&self.path, format!("no tensor {name:?}")))
    }

    /// The whole tensor, dequantized, `ne[0]` fastest.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let t = self.tensor(name)?;
        let mut raw = vec![0u8; t.bytes as usize];
        self.file
            .read_exact_at(&mut raw, self.data_start + t.offset)
            .map_err(|e| bad(&self.path, format!("reading tensor {name:?}: {e}")))?;
        Ok(dequantize(t.kind, &raw))
    }
}

fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_le_bytes([lo, hi]).to_f32()
}

/// `raw` (whole blocks of `kind`) as f32 values.
pub fn dequantize(kind: GgmlType, raw: &[u8]) -> Vec<f32> {
    match kind {
        GgmlType::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlType::F16 => raw.chunks_exact(2).map(|c| f16(c[0], c[1])).collect(),
        GgmlType::Q8_0 => raw
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16(b[0], b[1]);
                b[2..].iter().map(move |&q| f32::from(q as i8) * d)
            })
            .collect(),
        GgmlType::Q4_1 => raw
            .chunks_exact(20)
            .flat_map(|b| {
                let (d, m) = (f16(b[0], b[1]), f16(b[2], b[3]));
                let qs = &b[4..20];
                // The low nibbles are elements 0..16, the high nibbles 16..32.
                let low = qs.iter().map(move |&q| f32::from(q & 0x0f) * d + m);
                let high = qs.iter().map(move |&q| f32::from(q >> 4) * d + m);
                low.chain(high)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn quantized_blocks_decode_as_ggml_defines_them() {
        // Q4_1: scale 0.5, minimum -1; nibbles 0..15 low, 15..0 high.
        let mut block = vec![];
        block.extend(half::f16::from_f32(0.5).to_le_bytes());
        block.extend(half::f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(GgmlType::Q4_1, &block);
        assert_eq!(v.len(), 32);
        assert_eq!((v[0], v[15], v[16], v[31]), (-1.0, 6.5, 6.5, -1.0));
        // Q8_0: scale 0.25, values -128..
        let mut block = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &block);
        assert_eq!((v[0], v[16], v[31]), (-4.0, 0.0, 3.75));
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("rankway-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let err = |p: PathBuf| Gguf::open(&p).err().unwrap().to_string();
        assert!(err(write("magic", b"GGML\x03\0\0\0")).contains("bad magic"));
        let mut huge = b"GGUF\x03\0\0\0".to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        assert!(err(write("huge", &huge)).contains("over the limit"));
        let mut cut = b"GGUF\x03\0\0\0".to_vec();
        cut.extend(0u64.to_le_bytes());
        cut.extend(1u64.to_le_bytes());
        cut.extend(5u64.to_le_bytes());
        cut.extend(b"ab");
        assert!(err(write("cut", &cut)).contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// SmolLM2's file (scripts/setup.sh) read as the `gguf` PyPI package reads it
    /// (tests/fixtures/smollm2_gguf_reference.json, from scripts/make_gguf_reference.py).
    #[test]
    fn smollm2_reads_as_the_reference_reader_reads_it() {
        let reference: Json = serde_json::from_str(
            &std::fs::read_to_string(root().join("tests/fixtures/smollm2_gguf_reference.json")).unwrap(),
        )
        .unwrap();
        let g = Gguf::open(
            &root()
                .join("models/smollm2")
                .join(reference["file"].as_str().unwrap()),
        )
        .unwrap();
        assert_eq!(
            g.tensors().len() as u64,
            reference["tensor_count"].as_u64().unwrap()
        );
        for (key, want) in reference["metadata"].as_object().unwrap() {
            if let Some(key) = key.strip_suffix(".len") {
                let n = g.metadata(key).and_then(Value::as_array).map(<[Value]>::len);
                assert_eq!(n as Option<usize>, want.as_u64().map(|n| n as usize), "{key}");
                continue;
            }
            let got = g.metadata(key).unwrap_or_else(|| panic!("missing {key}"));
            match want {
                Json::String(s) => assert_eq!(got.as_str(), Some(s.as_str()), "{key}"),
                Json::Number(n) => assert_eq!(got.as_f64(), n.as_f64(), "{key}"),
                other => panic!("unexpected reference value {other}"),
            }
        }
        for (name, want) in reference["tensors"].as_object().unwrap() {
            let t = g.tensor(name).unwrap();
            assert_eq!(t.kind.name(), want["type"], "{name}");
            let ne: Vec<u64> = want["ne"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(t.ne, ne, "{name}");
            let values = g.read_f32(name).unwrap();
            assert_eq!(values.len() as u64, t.elements());
            // The same f32 values; JSON's decimal text may differ in the last bit.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
            for (i, w) in want["first"].as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!(
                    close(f64::from(values[i]), w),
                    "{name}[{i}]: {} vs {w}",
                    values[i]
                );
            }
            let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let abs: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
            assert!(
                close(sum, want["sum"].as_f64().unwrap()),
                "{name}: sum {sum} vs {}",
                want["sum"]
            );
            assert!(
                close(abs, want["abs_sum"].as_f64().unwrap()),
                "{name}: |sum| {abs}"
            );
        }
    }
}
