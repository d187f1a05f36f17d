// rescue_server: a Go TCP server for `keepfix rescue` (tests/rescue.rs), started without keepfix:
// LD_PRELOAD is no help with a Go binary, rescue is.
//
// It listens on 127.0.0.1 (port from argv[1], 0 = the kernel chooses), and every connection it
// accepts gets Go's own default keepalive (net.ListenConfig's 15 s: SO_KEEPALIVE, TCP_KEEPIDLE 15,
// TCP_KEEPINTVL 15, TCP_KEEPCNT left at the kernel's). It answers "pong\n" per line. THE BUG: at
// EOF it forgets the connection without Close(), keeping a reference so that Go's finalizer does
// not close it either: the socket stays in CLOSE_WAIT.
//
// stdout: READY port=P, ACCEPT, EOF, ERR msg=...
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

var (
	mu     sync.Mutex
	leaked []net.Conn
)

func serve(c net.Conn) {
	r := bufio.NewReader(c)
	for {
		if _, err := r.ReadString('\n'); err != nil {
			fmt.Println("EOF")
			mu.Lock()
			leaked = append(leaked, c) // never closed
			mu.Unlock()
			return
		}
		if _, err := c.Write([]byte("pong\n")); err != nil {
			fmt.Printf("ERR msg=write:%v\n", err)
		}
	}
}

func main() {
	port := "0"
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	ln, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-term
		mu.Lock()
		fmt.Printf("STATS leaked=%d\n", len(leaked))
		os.Exit(0)
	}()
	fmt.Printf("READY port=%d\n", ln.Addr().(*net.TCPAddr).Port)
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Printf("ERR msg=accept:%v\n", err)
			continue
		}
		fmt.Println("ACCEPT")
		go serve(c)
	}
}
