//! Reads a rank's shard straight from a `.safetensors` file: only the bytes of the
//! slices this rank owns are read (positioned reads, no mmap, no whole-file load), so a
//! rank of a model too large for one host needs only its own share of memory.
//!
//! Format: an 8-byte little-endian header length, a JSON header mapping each tensor name
//! to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the data that
//! follows the header), then the raw little-endian data, row-major.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::models::ModelError;

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
    /// The product of `shape`, checked when the header is read.
    #[serde(skip)]
    elements: u64,
}

/// The tensors a safetensors header (its JSON, after the length) lists, each checked:
/// dimensions are not negative and their product fits in 64 bits with room for the
/// element size, so no later size computation can overflow.
fn parse_header(header: &[u8]) -> Result<HashMap<String, Entry>, String> {
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header JSON: {e}"))?;
    raw.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let mut e: Entry = serde_json::from_value(v).map_err(|e| format!("header entry: {e}"))?;
            e.elements = e
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
                .filter(|&n| n <= (i64::MAX as u64) / 8)
                .ok_or_else(|| format!("tensor {k:?} has an impossible shape {:?}", e.shape))?;
            Ok((k, e))
        })
        .collect()
}

/// An open safetensors file and its header.
pub struct ShardReader {
    path: PathBuf,
    file: File,
    data_start: u64,
    entries: HashMap<String, Entry>,
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let err = |m: String| ModelError::Load(format!("{}: {m}", path.display()));
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| err(format!("header length: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(err(format!("header of {len} bytes is implausible")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| err(format!("header: {e}")))?;
        let entries = parse_header(&header).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            data_start: 8 + len,
            entries,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::Load(format!("{} has no tensor {name:?}", self.path.display())))?;
        if e.dtype != "F32" {
            return Err(ModelError::Load(format!(
                "tensor {name:?} is {}, only F32 is supported",
                e.dtype
            )));
        }
        if e.data_offsets[1].checked_sub(e.data_offsets[0]) != Some(e.elements * 4) {
            return Err(ModelError::Load(format!(
                "tensor {name:?}: offsets do not match its shape"
            )));
        }
        Ok(e)
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), ModelError> {
        self.file
            .read_exact_at(buf, self.data_start + offset)
            .map_err(|e| ModelError::Load(format!("{}: reading {name:?}: {e}", self.path.display())))
    }

    /// The whole tensor (for replicated weights).
    pub fn full(&self, name: &str) -> Result<Tensor, ModelError> {
        let e = self.entry(name)?;
        let mut buf = vec![0u8; (e.data_offsets[1] - e.data_offsets[0]) as usize];
        self.read(name, e.data_offsets[0], &mut buf)?;
        Ok(Tensor::from_data_size(&buf, &e.shape, Kind::Float))
    }

    /// Entries `[start, start + len)` along `dim` (0 = rows, 1 = columns of a matrix),
    /// reading only those bytes.
    pub fn slice(&self, name: &str, dim: usize, (start, len): (i64, i64)) -> Result<Tensor, ModelError> {
        let e = self.entry(name)?;
        let bad = || {
            ModelError::Load(format!(
                "tensor {name:?} {:?}: cannot take [{start}, +{len}) of dim {dim}",
                e.shape
            ))
        };
        let size = *e.shape.get(dim).ok_or_else(bad)?;
        if start < 0 || len < 0 || start + len > size || dim > 1 {
            return Err(bad());
        }
        // Bytes per step of dim 0 and of dim 1 (a 1-D tensor is one row of scalars).
        let inner: i64 = e.shape[1..].iter().product::<i64>() * 4;
        let mut shape = e.shape.clone();
        shape[dim] = len;
        let mut buf = vec![0u8; (shape.iter().product::<i64>() * 4) as usize];
        if dim == 0 {
            self.read(name, e.data_offsets[0] + (start * inner) as u64, &mut buf)?;
        } else {
            let (rows, col_bytes) = (e.shape[0], inner / e.shape[1]);
            let chunk = (len * col_bytes) as usize;
            for r in 0..rows {
                let at = e.data_offsets[0] + (r * inner + start * col_bytes) as u64;
                self.read(name, at, &mut buf[r as usize * chunk..(r as usize + 1) * chunk])?;
            }
        }
        Ok(Tensor::from_data_size(&buf, &shape, Kind::Float))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_equal_narrowed_full_tensors() {
        let dir = std::env::temp_dir().join(format!("rankway-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let m = Tensor::arange(24, (Kind::Float, tch::Device::Cpu)).view([4, 6]);
        let v = Tensor::arange(6, (Kind::Float, tch::Device::Cpu));
        Tensor::write_safetensors(&[("m", &m), ("v", &v)], &path).unwrap();
        let r = ShardReader::open(&path).unwrap();
        assert!(r.full("m").unwrap().equal(&m));
        assert!(r.slice("m", 0, (1, 2)).unwrap().equal(&m.narrow(0, 1, 2)));
        assert!(r.slice("m", 1, (2, 3)).unwrap().equal(&m.narrow(1, 2, 3)));
        assert!(r.slice("v", 0, (4, 2)).unwrap().equal(&v.narrow(0, 4, 2)));
        assert!(r.slice("m", 1, (5, 3)).is_err());
        assert!(r.full("missing").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fuzz_safetensors_header_reader() {
        use proptest::prelude::*;
        let dim = prop_oneof![0i64..8, any::<i64>()];
        let entry = (
            prop_oneof![Just("F32".to_owned()), "[A-Z0-9]{0,4}"],
            proptest::collection::vec(dim, 0..4),
            any::<[u64; 2]>(),
            0u64..64,
        )
            .prop_map(|(dtype, shape, offsets, start)| {
                // Half of them with offsets that match an F32 shape, if it has one.
                let bytes = shape
                    .iter()
                    .try_fold(4u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?));
                let offsets = match bytes {
                    Some(b) if offsets[0] % 2 == 0 => [start, start.saturating_add(b)],
                    _ => offsets,
                };
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets})
            });
        let header = prop_oneof![
            proptest::collection::btree_map("[a-z]{1,3}", entry, 0..4)
                .prop_map(|m| serde_json::to_vec(&m).unwrap()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ];
        rankway_runtime::fuzz::run("safetensors header reader", header, |header| {
            let Ok(entries) = parse_header(&header) else {
                return;
            };
            let reader = ShardReader {
                path: PathBuf::from("fuzz"),
                file: File::open("/dev/null").unwrap(),
                data_start: 8,
                entries,
            };
            let names: Vec<String> = reader.entries.keys().cloned().collect();
            for name in names {
                let _ = reader.entry(&name);
            }
        });
    }
}
