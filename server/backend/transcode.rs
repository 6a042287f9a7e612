//! Messages between proto3 JSON and protobuf, with a method's descriptors
//! (from `descriptors::Catalog`): what lets a caller speak JSON to any
//! service, and check a protobuf message before the service sees it. Knows
//! no transport: WebSocket v2 uses it today, and any binding of v2 will.

use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use tonic::Status;

/// A response message as proto3 JSON.
pub fn to_json(output: &MessageDescriptor, message: &[u8]) -> Result<String, Status> {
    let message = DynamicMessage::decode(output.clone(), message)
        .map_err(|e| Status::internal(format!("the service's reply is not a {}: {e}", output.full_name())))?;
    serde_json::to_string(&message).map_err(|e| Status::internal(format!("the reply does not map to JSON: {e}")))
}

/// Whether `bytes` decode as a `message` (protobuf wire format, known
/// fields with their wire types, strings UTF-8, nested messages likewise),
/// checked without building the message: a fraction of what decoding costs.
pub fn decodes_as(message: &MessageDescriptor, mut bytes: &[u8], depth: u32) -> bool {
    use prost::encoding::{WireType, decode_key, decode_varint};
    use prost_reflect::Kind;
    // prost's own recursion limit.
    if depth > 100 {
        return false;
    }
    while !bytes.is_empty() {
        let Ok((number, wire_type)) = decode_key(&mut bytes) else {
            return false;
        };
        let field = message.get_field(number);
        let kind = field.as_ref().map(|f| f.kind());
        let ok = match wire_type {
            WireType::Varint => {
                decode_varint(&mut bytes).is_ok()
                    && kind.as_ref().is_none_or(|k| {
                        matches!(
                            k,
                            Kind::Int32
                                | Kind::Int64
                                | Kind::Uint32
                                | Kind::Uint64
                                | Kind::Sint32
                                | Kind::Sint64
                                | Kind::Bool
                                | Kind::Enum(_)
                        )
                    })
            }
            WireType::SixtyFourBit => {
                skip(&mut bytes, 8)
                    && kind
                        .as_ref()
                        .is_none_or(|k| matches!(k, Kind::Fixed64 | Kind::Sfixed64 | Kind::Double))
            }
            WireType::ThirtyTwoBit => {
                skip(&mut bytes, 4)
                    && kind
                        .as_ref()
                        .is_none_or(|k| matches!(k, Kind::Fixed32 | Kind::Sfixed32 | Kind::Float))
            }
            WireType::LengthDelimited => {
                let Ok(length) = decode_varint(&mut bytes) else {
                    return false;
                };
                let Ok(length) = usize::try_from(length) else {
                    return false;
                };
                if length > bytes.len() {
                    return false;
                }
                let (value, rest) = bytes.split_at(length);
                bytes = rest;
                match (&field, kind) {
                    (None, _) => true,
                    (_, Some(Kind::String)) => std::str::from_utf8(value).is_ok(),
                    (_, Some(Kind::Bytes)) => true,
                    (_, Some(Kind::Message(nested))) => decodes_as(&nested, value, depth + 1),
                    // Packed repeated scalars.
                    (Some(field), _) => field.is_list(),
                }
            }
            // Groups (proto2's, deprecated) are not accepted.
            WireType::StartGroup | WireType::EndGroup => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Skips `n` bytes of `bytes`; whether there were that many.
fn skip(bytes: &mut &[u8], n: usize) -> bool {
    let fits = bytes.len() >= n;
    *bytes = &bytes[n.min(bytes.len())..];
    fits
}

/// A request message from proto3 JSON; unknown fields are ignored.
pub fn from_json(input: &MessageDescriptor, text: &[u8]) -> Result<Vec<u8>, Status> {
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let message = DynamicMessage::deserialize_with_options(input.clone(), &mut deserializer, &options)
        .and_then(|m| deserializer.end().map(|()| m))
        .map_err(|e| Status::invalid_argument(format!("message is not a valid {} in JSON: {e}", input.full_name())))?;
    Ok(prost::Message::encode_to_vec(&message))
}
