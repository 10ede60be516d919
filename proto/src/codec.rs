//! Raw tensor layout shared by the gateway and the workers.
//!
//! Numeric tensors are little-endian, row-major. A `BYTES` tensor is its elements one
//! after another, each a 4-byte little-endian length followed by the bytes — the layout
//! of OIP's `raw_input_contents`, used unchanged on the internal protocol.

use crate::worker::DataType;

/// Why a raw `BYTES` payload could not be split into elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BytesLayoutError(pub String);

impl std::fmt::Display for BytesLayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BytesLayoutError {}

/// Appends one `BYTES` element (length prefix + bytes) to `out`.
pub fn push_bytes_element(out: &mut Vec<u8>, element: &[u8]) {
    let len = u32::try_from(element.len()).expect("a BYTES element is limited to 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(element);
}

/// Serialises elements into the raw `BYTES` layout.
pub fn encode_bytes_elements<T: AsRef<[u8]>>(elements: &[T]) -> Vec<u8> {
    let total = elements.iter().map(|e| 4 + e.as_ref().len()).sum();
    let mut out = Vec::with_capacity(total);
    for e in elements {
        push_bytes_element(&mut out, e.as_ref());
    }
    out
}

/// Splits a raw `BYTES` payload into its elements, checking every length prefix.
pub fn decode_bytes_elements(raw: &[u8]) -> Result<Vec<&[u8]>, BytesLayoutError> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(BytesLayoutError(format!(
                "BYTES element {} has a truncated 4-byte length prefix",
                out.len()
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(BytesLayoutError(format!(
                "BYTES element {} declares {len} bytes but only {} remain",
                out.len(),
                tail.len()
            )));
        }
        let (element, tail) = tail.split_at(len);
        out.push(element);
        rest = tail;
    }
    Ok(out)
}

impl DataType {
    /// Size of one element in bytes; `None` for `BYTES`, whose elements vary.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Fp16 => Some(2),
            DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes | DataType::Unspecified => None,
        }
    }

    /// The OIP v2 name of this type (`"FP32"`, `"BYTES"`, ...).
    pub fn oip_name(self) -> &'static str {
        match self {
            DataType::Unspecified => "UNSPECIFIED",
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Int8 => "INT8",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses an OIP v2 type name; `None` for names Rankway does not carry.
    pub fn from_oip_name(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => DataType::Bool,
            "UINT8" => DataType::Uint8,
            "INT8" => DataType::Int8,
            "INT32" => DataType::Int32,
            "INT64" => DataType::Int64,
            "FP16" => DataType::Fp16,
            "FP32" => DataType::Fp32,
            "FP64" => DataType::Fp64,
            "BYTES" => DataType::Bytes,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_raw_bytes_codec() {
        // Any bytes: decoded or refused, never a panic.
        rankway_runtime::fuzz::run(
            "raw BYTES decoder",
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
            |raw| {
                let _ = decode_bytes_elements(&raw);
            },
        );
        // Whatever is encoded decodes to itself.
        let elements = proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
            0..8,
        );
        rankway_runtime::fuzz::run("raw BYTES round trip", elements, |elements| {
            let raw = encode_bytes_elements(&elements);
            let back = decode_bytes_elements(&raw).expect("an encoding decodes");
            assert_eq!(back, elements.iter().map(Vec::as_slice).collect::<Vec<_>>());
        });
    }

    #[test]
    fn bytes_round_trip() {
        let raw = encode_bytes_elements(&["a", "", "héllo"]);
        assert_eq!(raw.len(), 4 + 1 + 4 + 4 + 6);
        let back = decode_bytes_elements(&raw).unwrap();
        assert_eq!(back, vec![&b"a"[..], b"", "héllo".as_bytes()]);
    }

    #[test]
    fn bytes_rejects_bad_lengths() {
        let err = decode_bytes_elements(&[1, 0]).unwrap_err();
        assert!(err.0.contains("truncated"), "{err}");
        let err = decode_bytes_elements(&[9, 0, 0, 0, b'x']).unwrap_err();
        assert!(err.0.contains("declares 9 bytes but only 1 remain"), "{err}");
    }

    #[test]
    fn oip_names_round_trip() {
        for dt in [DataType::Bool, DataType::Int64, DataType::Fp32, DataType::Bytes] {
            assert_eq!(DataType::from_oip_name(dt.oip_name()), Some(dt));
        }
        assert_eq!(DataType::from_oip_name("FP8"), None);
    }
}
