//! The wire contract: `proto/data_service.proto` (what the server is built
//! from) must describe exactly the messages and service of the seed's proto
//! (`tests/python/seed/data_service.proto`, copied verbatim from the seed), so
//! that clients generated from the seed's file keep working.

#[test]
fn the_served_proto_is_wire_identical_to_the_seeds() {
    let root = env!("CARGO_MANIFEST_DIR");
    let ours = protox::compile(["data_service.proto"], [format!("{root}/proto")]).expect("proto/ compiles");
    let seed = protox::compile(["data_service.proto"], [format!("{root}/tests/python/seed")])
        .expect("the seed's proto compiles");
    let (ours, seed) = (&ours.file[0], &seed.file[0]);
    assert_eq!(
        ours.package, seed.package,
        "no package line: the method path is /DataService/BidirectionalStream"
    );
    assert_eq!(
        ours.message_type, seed.message_type,
        "messages: same names, fields, numbers and types"
    );
    assert_eq!(ours.service, seed.service, "service: same methods and streaming shape");
}
