//! Protobuf writing for the per-request signals (spans, and later log records): OTLP messages
//! encoded straight from meshtel's records with prost's wire primitives, without first building
//! the owned `opentelemetry-proto` structs (two allocations per attribute). Field numbers are
//! opentelemetry-proto's; the tests decode every output with the official types.

use prost::encoding::{encode_key, encode_varint, WireType};

/// `AnyValue` fields (common.proto).
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_ARRAY: u32 = 5;
/// `KeyValue` fields.
const KV_KEY: u32 = 1;
const KV_VALUE: u32 = 2;
/// `ArrayValue.values`.
const ARRAY_VALUES: u32 = 1;

/// An append-only protobuf writer. Scalar fields at their default value are skipped, as proto3
/// encoders do; nested messages are always written.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { buf: Vec::with_capacity(capacity) }
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// A `string` field; skipped when empty.
    pub fn string(&mut self, field: u32, value: &str) {
        self.bytes(field, value.as_bytes());
    }

    /// A `bytes` field; skipped when empty.
    pub fn bytes(&mut self, field: u32, value: &[u8]) {
        if !value.is_empty() {
            self.len_delimited(field, value);
        }
    }

    /// A `fixed64` field; skipped when zero.
    pub fn fixed64(&mut self, field: u32, value: u64) {
        if value != 0 {
            encode_key(field, WireType::SixtyFourBit, &mut self.buf);
            self.buf.extend_from_slice(&value.to_le_bytes());
        }
    }

    /// A `fixed32` field; skipped when zero.
    pub fn fixed32(&mut self, field: u32, value: u32) {
        if value != 0 {
            encode_key(field, WireType::ThirtyTwoBit, &mut self.buf);
            self.buf.extend_from_slice(&value.to_le_bytes());
        }
    }

    /// A varint field (`int32`, `uint32`, `int64`, enum); skipped when zero.
    pub fn varint(&mut self, field: u32, value: u64) {
        if value != 0 {
            encode_key(field, WireType::Varint, &mut self.buf);
            encode_varint(value, &mut self.buf);
        }
    }

    /// A `sint32` field (zigzag varint); skipped when zero.
    pub fn sint32(&mut self, field: u32, value: i32) {
        self.varint(field, u64::from(((value << 1) ^ (value >> 31)) as u32));
    }

    /// A `double` field written even at zero (an `optional` field, or a oneof member).
    pub fn double(&mut self, field: u32, value: f64) {
        encode_key(field, WireType::SixtyFourBit, &mut self.buf);
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    /// An `sfixed64` field written even at zero (a oneof member).
    pub fn sfixed64(&mut self, field: u32, value: i64) {
        encode_key(field, WireType::SixtyFourBit, &mut self.buf);
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    /// A `bool` field; skipped when false.
    pub fn bool(&mut self, field: u32, value: bool) {
        self.varint(field, u64::from(value));
    }

    /// A packed `repeated fixed64` field; skipped when empty.
    pub fn packed_fixed64(&mut self, field: u32, values: impl ExactSizeIterator<Item = u64>) {
        if values.len() > 0 {
            encode_key(field, WireType::LengthDelimited, &mut self.buf);
            encode_varint(values.len() as u64 * 8, &mut self.buf);
            values.for_each(|v| self.buf.extend_from_slice(&v.to_le_bytes()));
        }
    }

    /// A packed `repeated uint32` or `uint64` field; skipped when empty.
    pub fn packed_varint<T: Copy + Into<u64>>(&mut self, field: u32, values: &[T]) {
        if !values.is_empty() {
            encode_key(field, WireType::LengthDelimited, &mut self.buf);
            let len: usize = values.iter().map(|v| prost::encoding::encoded_len_varint((*v).into())).sum();
            encode_varint(len as u64, &mut self.buf);
            values.iter().for_each(|v| encode_varint((*v).into(), &mut self.buf));
        }
    }

    /// A packed `repeated double` field; skipped when empty.
    pub fn packed_double(&mut self, field: u32, values: &[f64]) {
        if !values.is_empty() {
            encode_key(field, WireType::LengthDelimited, &mut self.buf);
            encode_varint(values.len() as u64 * 8, &mut self.buf);
            values.iter().for_each(|v| self.buf.extend_from_slice(&v.to_le_bytes()));
        }
    }

    /// One element of a `repeated string` field: written even when empty (its position counts).
    pub fn repeated_string(&mut self, field: u32, value: &str) {
        self.len_delimited(field, value.as_bytes());
    }

    /// A message field whose encoding is already at hand (a resource or scope encoded once).
    pub fn encoded_message(&mut self, field: u32, encoded: &[u8]) {
        self.len_delimited(field, encoded);
    }

    /// A message field written by `body`.
    pub fn message(&mut self, field: u32, body: impl FnOnce(&mut Self)) {
        encode_key(field, WireType::LengthDelimited, &mut self.buf);
        // One byte holds the length of most messages here (attributes); longer ones move their
        // body right by the extra length bytes once.
        let at = self.buf.len();
        self.buf.push(0);
        body(self);
        let len = self.buf.len() - at - 1;
        if len < 0x80 {
            self.buf[at] = len as u8;
        } else {
            let mut prefix = Vec::with_capacity(4);
            encode_varint(len as u64, &mut prefix);
            self.buf.splice(at..=at, prefix);
        }
    }

    /// A `KeyValue` with a string value.
    pub fn string_attribute(&mut self, field: u32, key: &str, value: &str) {
        self.message(field, |w| {
            w.string(KV_KEY, key);
            w.message(KV_VALUE, |w| w.len_delimited(ANY_STRING, value.as_bytes()));
        });
    }

    /// A `KeyValue` with an integer value.
    pub fn int_attribute(&mut self, field: u32, key: &str, value: i64) {
        self.message(field, |w| {
            w.string(KV_KEY, key);
            w.message(KV_VALUE, |w| {
                // A oneof member is written even at its default value.
                encode_key(ANY_INT, WireType::Varint, &mut w.buf);
                encode_varint(value as u64, &mut w.buf);
            });
        });
    }

    /// A `KeyValue` with a boolean value.
    pub fn bool_attribute(&mut self, field: u32, key: &str, value: bool) {
        self.message(field, |w| {
            w.string(KV_KEY, key);
            w.message(KV_VALUE, |w| {
                encode_key(ANY_BOOL, WireType::Varint, &mut w.buf);
                encode_varint(u64::from(value), &mut w.buf);
            });
        });
    }

    /// A `KeyValue` with an array of strings.
    pub fn string_array_attribute(&mut self, field: u32, key: &str, values: &[String]) {
        self.message(field, |w| {
            w.string(KV_KEY, key);
            w.message(KV_VALUE, |w| {
                w.message(ANY_ARRAY, |w| {
                    for v in values {
                        w.message(ARRAY_VALUES, |w| w.len_delimited(ANY_STRING, v.as_bytes()));
                    }
                });
            });
        });
    }

    fn len_delimited(&mut self, field: u32, value: &[u8]) {
        encode_key(field, WireType::LengthDelimited, &mut self.buf);
        encode_varint(value.len() as u64, &mut self.buf);
        self.buf.extend_from_slice(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, ArrayValue, KeyValue};
    use prost::Message;

    /// Decodes `KeyValue`s written as field 1 of an otherwise empty message.
    #[derive(Clone, PartialEq, Message)]
    struct Attributes {
        #[prost(message, repeated, tag = "1")]
        values: Vec<KeyValue>,
    }

    fn decode(w: Writer) -> Vec<(String, Option<Value>)> {
        let a = Attributes::decode(w.into_bytes().as_slice()).unwrap();
        a.values.into_iter().map(|kv| (kv.key, kv.value.and_then(|v| v.value))).collect()
    }

    #[test]
    fn attributes_decode_with_the_official_types() {
        let mut w = Writer::default();
        w.string_attribute(1, "a", "x");
        w.string_attribute(1, "empty", "");
        w.int_attribute(1, "zero", 0);
        w.int_attribute(1, "negative", -5);
        w.string_array_attribute(1, "list", &["p".into(), String::new()]);
        w.bool_attribute(1, "flag", true);
        let long = "v".repeat(300);
        w.string_attribute(1, "long", &long);
        let got = decode(w);
        assert_eq!(got[0], ("a".into(), Some(Value::StringValue("x".into()))));
        assert_eq!(got[1], ("empty".into(), Some(Value::StringValue(String::new()))));
        assert_eq!(got[2], ("zero".into(), Some(Value::IntValue(0))));
        assert_eq!(got[3], ("negative".into(), Some(Value::IntValue(-5))));
        let strings = |v: &[&str]| v.iter().map(|s| Some(Value::StringValue(s.to_string()))).collect::<Vec<_>>();
        let Some(Value::ArrayValue(ArrayValue { values })) = &got[4].1 else { panic!("an array: {:?}", got[4]) };
        assert_eq!(values.iter().map(|v| v.value.clone()).collect::<Vec<_>>(), strings(&["p", ""]));
        assert_eq!(got[5], ("flag".into(), Some(Value::BoolValue(true))));
        assert_eq!(got[6], ("long".into(), Some(Value::StringValue(long))));
    }

    #[test]
    fn lengths_past_one_byte_are_spliced_in() {
        for n in [0, 1, 120, 125, 126, 127, 128, 129, 16_383, 16_384, 70_000] {
            let value = "x".repeat(n);
            let mut w = Writer::default();
            w.string_attribute(1, "k", &value);
            w.string_attribute(1, "after", "y");
            let got = decode(w);
            assert_eq!(got[0].1, Some(Value::StringValue(value)), "length {n}");
            assert_eq!(got[1].1, Some(Value::StringValue("y".into())), "length {n}");
        }
    }

    #[test]
    fn scalars_at_default_are_skipped() {
        let mut w = Writer::default();
        w.string(1, "");
        w.bytes(2, &[]);
        w.fixed64(3, 0);
        w.fixed32(4, 0);
        w.varint(5, 0);
        assert!(w.into_bytes().is_empty());
    }
}
