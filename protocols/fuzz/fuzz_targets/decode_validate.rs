//! Request decoding and validation as the agent does them, on arbitrary
//! bytes: nothing may panic, and whatever validates must survive a round
//! trip through the API form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socklb_protocols::{
    protobuf::Message as _,
    socklb::{self as api, DeleteRequest, SyncPartRequest, SyncRequest, UpsertRequest},
};
use socklb_table::{Service, ServiceKey, Table};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = SyncRequest::parse_from_bytes(data)
        && let Ok(table) = Table::from_api(&request.services)
    {
        let again = Table::from_api(&table.to_api()).expect("a valid table stays valid");
        assert_eq!(again, table);
        assert_eq!(again.digest(), table.digest());
    }
    if let Ok(request) = UpsertRequest::parse_from_bytes(data) {
        each_service_round_trips(&request.services);
    }
    // A part of a Sync in parts is validated service by service the same way.
    if let Ok(request) = SyncPartRequest::parse_from_bytes(data) {
        each_service_round_trips(&request.services);
    }
    if let Ok(request) = DeleteRequest::parse_from_bytes(data) {
        for key in &request.keys {
            if let Ok(key) = ServiceKey::from_api("fuzz", key) {
                assert_eq!(ServiceKey::from_api("fuzz", &key.to_api()).unwrap(), key);
            }
        }
    }
});

fn each_service_round_trips(services: &[api::Service]) {
    for (index, service) in services.iter().enumerate() {
        if let Ok(service) = Service::from_api(index, service) {
            assert_eq!(
                Service::from_api(index, &service.to_api()).unwrap(),
                service
            );
        }
    }
}
