module keepfix.test/rescue_server

go 1.19
