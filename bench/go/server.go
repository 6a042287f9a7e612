// The seed's DataService in Go (grpc-go), as the tutorial writes it: Recv in a
// loop, "processed: " + data, Send; io.EOF ends the call with OK. Built by
// `cargo xtask bench` in GOPATH mode from Debian's grpc-go packages (no module
// downloads); the generated code comes from proto/data_service.proto.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"

	"google.golang.org/grpc"

	pb "sbbench/pb"
)

type dataService struct {
	pb.UnimplementedDataServiceServer
}

func (s *dataService) BidirectionalStream(stream pb.DataService_BidirectionalStreamServer) error {
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&pb.StreamResponse{Result: "processed: " + req.Data}); err != nil {
			return err
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "address to listen on")
	flag.Parse()
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	server := grpc.NewServer()
	pb.RegisterDataServiceServer(server, &dataService{})
	fmt.Printf("grpc-go listening on %s\n", lis.Addr())
	if err := server.Serve(lis); err != nil {
		log.Fatalf("serve: %v", err)
	}
}
