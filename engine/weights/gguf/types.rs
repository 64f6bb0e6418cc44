//! GGML tensor types as GGUF stores them: their ids, names and block layouts.

/// A tensor element type of the GGML family, as stored in a GGUF tensor info.
///
/// Every type llama.cpp defines is named so that errors can say which one a file uses; only
/// [`GgmlType::is_supported`] ones can be dequantised. Ids this crate does not know at all are
/// kept as [`GgmlType::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// An id this crate does not know; its byte size cannot be computed.
    Unknown(u32),
}

/// `(id, type, elements per block, bytes per block)` for every known type.
const TABLE: &[(u32, GgmlType, u64, u64)] = &[
    (0, GgmlType::F32, 1, 4),
    (1, GgmlType::F16, 1, 2),
    (2, GgmlType::Q4_0, 32, 18),
    (3, GgmlType::Q4_1, 32, 20),
    (6, GgmlType::Q5_0, 32, 22),
    (7, GgmlType::Q5_1, 32, 24),
    (8, GgmlType::Q8_0, 32, 34),
    (9, GgmlType::Q8_1, 32, 40),
    (10, GgmlType::Q2_K, 256, 84),
    (11, GgmlType::Q3_K, 256, 110),
    (12, GgmlType::Q4_K, 256, 144),
    (13, GgmlType::Q5_K, 256, 176),
    (14, GgmlType::Q6_K, 256, 210),
    (15, GgmlType::Q8_K, 256, 292),
    (16, GgmlType::IQ2_XXS, 256, 66),
    (17, GgmlType::IQ2_XS, 256, 74),
    (18, GgmlType::IQ3_XXS, 256, 98),
    (19, GgmlType::IQ1_S, 256, 50),
    (20, GgmlType::IQ4_NL, 32, 18),
    (21, GgmlType::IQ3_S, 256, 110),
    (22, GgmlType::IQ2_S, 256, 82),
    (23, GgmlType::IQ4_XS, 256, 136),
    (24, GgmlType::I8, 1, 1),
    (25, GgmlType::I16, 1, 2),
    (26, GgmlType::I32, 1, 4),
    (27, GgmlType::I64, 1, 8),
    (28, GgmlType::F64, 1, 8),
    (29, GgmlType::IQ1_M, 256, 56),
    (30, GgmlType::BF16, 1, 2),
    (34, GgmlType::TQ1_0, 256, 54),
    (35, GgmlType::TQ2_0, 256, 66),
    (39, GgmlType::MXFP4, 32, 17),
];

impl GgmlType {
    /// The type with GGUF id `id` (`Unknown(id)` when this crate does not know it).
    pub fn from_id(id: u32) -> GgmlType {
        TABLE
            .iter()
            .find(|e| e.0 == id)
            .map_or(GgmlType::Unknown(id), |e| e.1)
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Unknown(id) => id,
            t => TABLE.iter().find(|e| e.1 == t).map_or(u32::MAX, |e| e.0),
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for an unknown id.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        TABLE.iter().find(|e| e.1 == self).map(|e| (e.2, e.3))
    }

    /// Whether [`super::GgufFile::dequantize`] can convert this type to f32.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q4_K
                | GgmlType::Q6_K
        )
    }

    /// The name llama.cpp uses for this type (`"Q4_1"`, `"F32"`, ...).
    pub fn name(self) -> String {
        match self {
            GgmlType::Unknown(id) => format!("unknown type id {id}"),
            t => format!("{t:?}"),
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}
