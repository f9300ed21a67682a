// ttrpc-call: an independent ttrpc client for the tests, built on containerd's own ttrpc package.
//
// It dials one address and keeps one ttrpc.Client. Each line on stdin is a JSON command; every
// call runs in a goroutine of its own on that one client, so calls overlap as they do in a
// shim. Each result is one JSON line on stdout, tagged like its command:
//
//	{"tag":"a","service":"grpc.Health","method":"Check","payload":"<base64>","timeout_ms":0}
//	-> {"tag":"a","code":0,"message":"","payload":"<base64>"}
//	{"tag":"z","close":true}  closes the client; its result comes once it is closed
//
// Payloads are encoded messages; the test encodes and decodes them with its own protobufs.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// raw carries an already encoded message through ttrpc's gogo codec.
type raw struct{ b []byte }

func (r *raw) Reset()                   { r.b = nil }
func (r *raw) String() string           { return fmt.Sprintf("raw(%d bytes)", len(r.b)) }
func (r *raw) ProtoMessage()            {}
func (r *raw) Marshal() ([]byte, error) { return r.b, nil }
func (r *raw) Unmarshal(b []byte) error { r.b = append([]byte(nil), b...); return nil }

type command struct {
	Tag       string `json:"tag"`
	Service   string `json:"service"`
	Method    string `json:"method"`
	Payload   []byte `json:"payload"`
	TimeoutMs int64  `json:"timeout_ms"`
	Close     bool   `json:"close"`
}

type result struct {
	Tag     string `json:"tag"`
	Code    uint32 `json:"code"`
	Message string `json:"message"`
	Payload []byte `json:"payload"`
	Error   string `json:"error,omitempty"`
}

func dial(addr string) (net.Conn, error) {
	switch {
	case strings.HasPrefix(addr, "tcp://"):
		return net.Dial("tcp", strings.TrimPrefix(addr, "tcp://"))
	case strings.HasPrefix(addr, "unix://"):
		return net.Dial("unix", strings.TrimPrefix(addr, "unix://"))
	}
	return nil, fmt.Errorf("unsupported address %q", addr)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: ttrpc-call tcp://HOST:PORT | unix:///PATH")
		os.Exit(2)
	}
	conn, err := dial(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := ttrpc.NewClient(conn)
	var out sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	emit := func(r result) {
		out.Lock()
		defer out.Unlock()
		enc.Encode(r)
	}
	var calls sync.WaitGroup
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 64<<20), 64<<20)
	for scanner.Scan() {
		var cmd command
		if err := json.Unmarshal(scanner.Bytes(), &cmd); err != nil {
			emit(result{Error: err.Error()})
			continue
		}
		if cmd.Close {
			client.Close()
			calls.Wait()
			emit(result{Tag: cmd.Tag})
			continue
		}
		calls.Add(1)
		go func(cmd command) {
			defer calls.Done()
			ctx := context.Background()
			if cmd.TimeoutMs > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, time.Duration(cmd.TimeoutMs)*time.Millisecond)
				defer cancel()
			}
			var resp raw
			err := client.Call(ctx, cmd.Service, cmd.Method, &raw{b: cmd.Payload}, &resp)
			r := result{Tag: cmd.Tag, Payload: resp.b}
			if errors.Is(err, context.DeadlineExceeded) { // the client's own deadline came first
				r.Code, r.Message = uint32(codes.DeadlineExceeded), err.Error()
			} else if err != nil {
				st, _ := status.FromError(err)
				r.Code, r.Message = uint32(st.Code()), st.Message()
			}
			emit(r)
		}(cmd)
	}
	calls.Wait()
}
